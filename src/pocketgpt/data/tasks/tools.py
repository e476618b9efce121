"""The tools a task's "tool" rendering calls, and the chat messages that record a call.

Training data and inference agree on what a tool returns: the tool loop (toolloop.py) answers a
`calculator` or `search` call with these same functions (`task_tools`).

    calculator("123*45")                       # '5535'
    search(world, "population of Dorin")       # 'Dorin is a city in Velmo. The population of Dorin is 52000.'
    search(world, "Dorin")                     # the article's opening sentences
    use_calculator("123*45")       # [assistant message with tool_calls, tool message '5535']
"""

from __future__ import annotations

import hashlib
import json
import re

from ..world import World
from .base import decimal_string
from .expr import evaluate


def calculator(expression: str) -> str:
    """Evaluate + - * / and parentheses exactly; non-integers are shown to 6 decimals."""
    try:
        return decimal_string(evaluate(expression), 6, strip=True)
    except ValueError as error:
        return f"error: {error}"


SNIPPET_SENTENCES = 2


def search(world: World, query: str) -> str:
    """A snippet of the best article for the query, as a search engine shows one: its sentences that
    share the most words with the query beyond the title (all of them name it), in the article's order.
    Whole articles filled a 256-token context after two searches, before the model could answer."""
    hits = world.search(query, k=1)
    if not hits:
        return "no results"
    title = set(re.findall(r"\w+", hits[0]["title"].lower()))
    words = set(re.findall(r"\w+", query.lower())) - title
    sentences = [x.strip() for x in re.split(r"(?<=\.)\s+", hits[0]["text"]) if x.strip()]
    overlap = [len(words & set(re.findall(r"\w+", x.lower()))) for x in sentences]
    best = sorted(range(len(sentences)), key=lambda i: -overlap[i])[:SNIPPET_SENTENCES]  # stable: earlier first
    return " ".join(sentences[i] for i in sorted(best))


# What each tool takes, as OpenAI function specs: sent with a request so a model (or a server's
# constrained decoder) knows the call's shape.
SPECS = {
    "calculator": {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression exactly (+ - * / and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    "search": {"type": "function", "function": {
        "name": "search", "description": "Look up an entity (a city, country, person...) in the encyclopedia.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
}


def task_tools(world: World) -> dict:
    """The tools the tool renderings use, by name, for generate_with_tools (toolloop.py)."""
    return {"calculator": calculator, "search": lambda query: search(world, query)}


def tool_use(name: str, result: str, **arguments: str) -> list[dict]:
    """An assistant message that calls one tool and the tool's message with its result, in OpenAI's chat
    fine-tuning format: arguments as a JSON string, the call's id tying the result to it."""
    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    call_id = "call_" + hashlib.sha256(f"{name}:{function['arguments']}".encode()).hexdigest()[:16]
    return [{"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": function}]},
            {"role": "tool", "tool_call_id": call_id, "name": name, "content": result}]


def use_calculator(expression: str) -> list[dict]:
    return tool_use("calculator", calculator(expression), expression=expression)


def use_search(world: World, query: str) -> list[dict]:
    return tool_use("search", search(world, query), query=query)
