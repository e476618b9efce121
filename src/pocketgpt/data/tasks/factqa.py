"""Fact QA over the synthetic world: closed book, with search, and "I don't know".

One question per fact ("What is the capital of Velmo?"). The fact's tier decides what a good
closed-book answer is: head and tail facts must be answered with their value (a refusal is wrong);
unseen facts were never in pretraining, so the canonical answer is "I don't know." — though the
right value (found with the search tool) is accepted too. Making things up is always wrong.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ...errors import PocketError
from ..world import ATTRIBUTE, TIERS, World, show_value, statement
from .base import UNLIMITED, Example, Task, assistant, final_answer, is_refusal, mentions
from .prompts import passages_prompt
from .tools import use_search

REFUSAL = "I don't know."


class FactQA(Task):
    styles = ("direct", "tool", "sentence", "rag")
    practice_style = "rag"  # reading practice: the sentence that answers, picked from the passages
    sizes = UNLIMITED  # bounded by the world's facts

    def __init__(self, world: World, seed: int = 0, tier: str | None = None):
        if tier is not None and tier not in TIERS:
            raise PocketError(f"unknown tier {tier!r}; available: {', '.join(TIERS)}")
        super().__init__(seed)
        self.world = world
        self.tier = tier
        self.name = f"factqa_{tier}" if tier else "factqa"

    def generate(self, rng: random.Random) -> Iterator[Example]:
        for fact in self.world.facts:
            # Draw the phrasing before filtering by tier, so factqa_head's questions are factqa's.
            question = rng.choice(ATTRIBUTE[(fact.kind, fact.attribute)].questions).format(e=fact.entity)
            if self.tier in (None, fact.tier):
                answer = REFUSAL if fact.tier == "unseen" else fact.value
                meta = {"entity": fact.entity, "kind": fact.kind, "attribute": fact.attribute,
                        "value": fact.value, "tier": fact.tier}
                yield Example(question, answer, meta)

    def split_key(self, example: Example) -> str:
        return f"{example.meta['entity']}|{example.meta['attribute']}"

    def check(self, example: Example, output: str) -> bool:
        answer = final_answer(output)
        if is_refusal(answer):
            return example.meta["tier"] == "unseen"
        return mentions(answer, example.meta["value"])

    def render(self, example: Example, style: str = "direct") -> list[dict]:
        """"rag": the question after two passages of the encyclopedia (the prompt rag/answer.py writes);
        the answer states the fact when a passage holds it, else "I don't know." (a third of the time the
        right passage is missing, so the model learns to read its context, not to recite)."""
        if style != "rag":
            return super().render(example, style)
        draw = example.meta.get("draw", 0)  # SFT asks for several draws of one fact (train/sft.py: redrawn)
        rng = random.Random(f"{example.question}:rag" + (f":{draw}" if draw else ""))
        m = example.meta
        stated = statement(self.world.fact(m["entity"], m["attribute"]))
        gold = self._passage(m["entity"], rng, holding=stated)  # the article's own sentence for the fact
        other = rng.choice([e for e in self.world.entities() if e.name != m["entity"]])
        passages = [self._passage(other.name, rng), gold if rng.random() < 2 / 3 else
                    self._passage(rng.choice([e for e in self.world.entities() if e.name != m["entity"]]).name, rng)]
        rng.shuffle(passages)
        holds = gold in passages
        answer = stated if holds else REFUSAL
        return [{"role": "user", "content": passages_prompt(example.question, passages)}, assistant(answer)]

    def _passage(self, entity: str, rng: random.Random, holding: str | None = None) -> tuple[str, str]:
        """One of an entity's passages (World.passages: what retrieval returns, with its chunk id), as
        (chunk id, text); with `holding`, one that contains that text."""
        passages = self.world.passages(entity)
        holders = [p for p in passages if holding is None or holding.lower() in p["text"].lower()]
        chosen = rng.choice(holders or passages)
        return f"{chosen['id']}#0", chosen["text"]

    def scores(self, example: Example, output: str) -> dict[str, float]:
        """Whether the answer states the true value (for unseen entities `check` also accepts an honest
        refusal; this does not: it is what retrieval is for)."""
        return {"states_the_value": float(mentions(final_answer(output), example.meta["value"]))}

    def sentence(self, example: Example) -> str:
        """"The capital of Lulzer is Ferpa." Restating the subject puts it right before the value, as
        in the pretraining text, which makes recall much easier for a small model."""
        if example.meta["tier"] == "unseen":
            return REFUSAL
        rng = random.Random(f"{example.meta['entity']}|{example.meta['attribute']}")
        attribute = ATTRIBUTE[(example.meta["kind"], example.meta["attribute"])]
        value = show_value(example.meta["value"], attribute.numeric, rng)
        return rng.choice(attribute.statements).format(e=example.meta["entity"], v=value)

    def phrasings(self, example: Example) -> list[Example]:
        """The same fact asked in every way the world knows (more varied data for fine-tuning)."""
        attribute = ATTRIBUTE[(example.meta["kind"], example.meta["attribute"])]
        return [Example(q.format(e=example.meta["entity"]), example.answer, example.meta) for q in attribute.questions]

    def tool(self, example: Example) -> list[dict]:
        # The query in the encyclopedia's own words ("The capital of Velmo is"), so the snippet holds the value.
        attribute = ATTRIBUTE[(example.meta["kind"], example.meta["attribute"])]
        query = attribute.statements[0].format(e=example.meta["entity"], v="").strip()
        return [*use_search(self.world, query), assistant(example.meta["value"])]
