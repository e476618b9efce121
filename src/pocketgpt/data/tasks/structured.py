"""Structured output: answer as JSON matching a schema.

"Give the attributes of the city Dorin as JSON with the keys country, population." The verifier
wants JSON (a ```json fence is fine), valid against the schema in `meta["schema"]`, with the right
values. Constrained decoding (`constrain`) can guarantee the first two; only knowledge gives the third.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

from ..world import ATTRIBUTE, ATTRIBUTES, World, rarest
from .base import Example, Task

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def validate(value: object, schema: dict) -> bool:
    """A tiny JSON-schema check for the subset we emit: object/required/properties/
    additionalProperties=false, and leaf types string and integer."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return False
        properties = schema.get("properties", {})
        if any(key not in value for key in schema.get("required", ())):
            return False
        if schema.get("additionalProperties", True) is False and any(key not in properties for key in value):
            return False
        return all(validate(value[key], sub) for key, sub in properties.items() if key in value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    raise ValueError(f"unsupported schema type {kind!r}")


def extract_json(output: str) -> object | None:
    """The JSON value in a reply: inside the last ```json fence, else from the first "{" to the last "}"."""
    fences = FENCE.findall(output)
    text = fences[-1] if fences else output[output.find("{"):output.rfind("}") + 1]
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


class Structured(Task):
    name = "structured"

    def __init__(self, world: World, seed: int = 0):
        super().__init__(seed)
        self.world = world

    def generate(self, rng: random.Random) -> Iterator[Example]:
        # Only entities a closed-book model could know; unseen ones belong to fact QA's refusals.
        entities = [e for e in self.world.entities() if e.tier != "unseen"]
        while entities:
            entity = rng.choice(entities)
            attrs = [a for a in ATTRIBUTES if a.kind == entity.kind]
            chosen = rng.sample(attrs, rng.randint(2, len(attrs)))
            facts = [self.world.fact(entity.name, a.name) for a in chosen]
            tier = rarest(*(f.tier for f in facts))
            if tier == "unseen":
                continue
            numeric = {f.attribute: ATTRIBUTE[(f.kind, f.attribute)].numeric for f in facts}
            values = {f.attribute: int(f.value) if numeric[f.attribute] else f.value for f in facts}
            # Bounds a user would write too (the world's values are short): they also keep a constrained
            # decoder from wandering in an endless string or digit run.
            schema = {"type": "object",
                      "properties": {k: {"type": "integer", "minimum": 0, "maximum": 10**9} if numeric[k]
                                     else {"type": "string", "maxLength": 40} for k in values},
                      "required": list(values), "additionalProperties": False}
            keys = ", ".join(values)
            question = (f"Give the attributes of the {entity.kind} {entity.name} as JSON with the keys "
                        f"{keys}. Use integers for numbers.")
            meta = {"entity": entity.name, "schema": schema, "values": values, "tier": tier}
            yield Example(question, json.dumps(values, ensure_ascii=False), meta)

    def check(self, example: Example, output: str) -> bool:
        return self.scores(example, output)["field_accuracy"] == 1.0

    def answer_key(self, example: Example, output: str) -> str:
        """The reply's object as `check` reads it (text fields stripped and lowercased), "" when it holds none
        that fits the schema: lowercased words made a valid reply and a broken one, or one with another
        answer line after it, the same vote."""
        value = extract_json(output)
        if not validate(value, example.meta["schema"]):
            return ""
        return json.dumps({k: v.strip().lower() if isinstance(v, str) else v for k, v in value.items()}, sort_keys=True)

    def scores(self, example: Example, output: str) -> dict[str, float]:
        """Whether the reply is valid against the schema, and the share of its fields that are right
        (0 for a reply that is not valid)."""
        value = extract_json(output)
        if not validate(value, example.meta["schema"]):
            return {"schema_valid": 0.0, "field_accuracy": 0.0}
        expected = example.meta["values"]
        right = sum(value[k].strip().lower() == v.lower() if isinstance(v, str) else value[k] == v
                    for k, v in expected.items())
        return {"schema_valid": 1.0, "field_accuracy": right / len(expected)}
